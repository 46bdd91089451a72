"""The network-input contract, one place for every path into the encoder: the DeepLesion
patches that pretraining reads and the labelled CT that fine-tuning, the probe and prediction
read. CT is clipped to HU_RANGE and divided by HU_SCALE (to [-1, 1]), in the DeepLesion
patches' anatomical orientation (nibabel axis codes PRETRAINING_AXCODES: depth to inferior,
then posterior, then the patient's left), depth first (docs/method.md, sections 2 and 7)."""

HU_RANGE = (-1024.0, 1024.0)  # the DeepLesion step clips before resampling; downstream clips after it
HU_SCALE = 1024.0  # the views and downstream inputs are HU / HU_SCALE
PRETRAINING_AXCODES = "PLI"  # nibabel codes of the DeepLesion patches (NIH's affine)
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes name the direction an axis runs to, as nibabel's do


def reorient(arr_xyz, affine, axcodes: str = PRETRAINING_AXCODES):
    """The volume (nibabel's (x, y, z) order, RAS affine) permuted and flipped to the nearest
    orientation `axcodes`, as MONAI's Orientation does (no resampling), with its new affine."""
    import nibabel as nib

    current = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(axcodes, labels=RAS_LABELS))
    out = nib.orientations.apply_orientation(arr_xyz, transform)
    return out, affine @ nib.orientations.inv_ornt_aff(transform, arr_xyz.shape)


def ras_affine(image):
    """The RAS affine (nibabel's and MONAI's convention) of a SimpleITK image, whose geometry is
    LPS, for its array transposed to (x, y, z)."""
    import numpy as np

    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
