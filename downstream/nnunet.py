"""Fine-tuning a DeSD teacher inside nnU-Net v2 (docs/method.md, section 7): plans that name
the DeSD segmentation network (`models.nnunet.DeSDUNet`), and the teacher converted to
nnU-Net's `-pretrained_weights` format. From a raw nnU-Net dataset to predictions:

    nnUNetv2_plan_and_preprocess -d 3 --no_pp                  # nnU-Net's fingerprint and plans
    desd-nnunet-plans -d 3 --arch res3d50 --pretrained teacher.pth
    nnUNetv2_preprocess -d 3 -plans_name nnUNetPlans_DeSD -c 3d_fullres
    nnUNetv2_train 3 3d_fullres 0 -p nnUNetPlans_DeSD -pretrained_weights $nnUNet_preprocessed/Dataset003_Liver/nnUNetPlans_DeSD_res3d50.pth
    nnUNetv2_predict -i imagesTs -o preds -d 3 -c 3d_fullres -p nnUNetPlans_DeSD -f 0

The plans (`desd_plans`) copy nnU-Net's for the dataset with one configuration changed:
- the network: DeSDUNet with the encoder's arch, taking nnU-Net's array to the pretraining
  orientation (`input_axes`, `input_flips`, from the training images' headers, nnU-Net's
  reader and its `transpose_forward`); the training images must share one orientation;
- the pretraining spacing, isotropic (1 mm);
- a patch that is a multiple of the encoder's total stride, (64, 128, 128) in the pretraining
  order, cut to the dataset's median image where that is smaller;
- `NoNormalization`: the network clips to [-1024, 1024] HU and divides by 1024 itself;
- deep supervision as nnU-Net trains by default (`strides` declare its 4 output scales), so
  the trainer is nnU-Net's own `nnUNetTrainer` (or any variant of it).

The weights file (`convert_teacher`) holds the whole network's state: the teacher's backbone
in the encoder, the decoder as initialised (seeded), and no output layer (`seg_layers`, which
nnU-Net leaves out), so it fits any number of classes.
"""

from __future__ import annotations

import copy
import glob
import inspect
import json
import math
import os
import pydoc
import sys
from collections import Counter

import torch

from models import list_models
from models.nnunet import DS_STRIDES, DeSDUNet, ds_strides
from models.pretrained import load_pretrained_encoder
from models.segmentation import STRIDE
from preprocessing import files
from preprocessing.files import write_atomic
from preprocessing.network_input import PRETRAINING_AXCODES, RAS_LABELS
from preprocessing.runner import command_parser, entry, positive_float, run_command

from . import labelled

NETWORK = f"{DeSDUNet.__module__}.{DeSDUNet.__name__}"
# network axes (depth, rows, cols) of the pretraining layout: nibabel codes (I, P, L)
NETWORK_CODES = (PRETRAINING_AXCODES[2], PRETRAINING_AXCODES[0], PRETRAINING_AXCODES[1])
OPPOSITE = {a: b for pair in RAS_LABELS for a, b in (pair, pair[::-1])}
READERS_IN_STORED_ORDER = ("SimpleITKIO", "NibabelIO")  # arrays in the reversed order of the file's axes
REORIENTING_READERS = {"NibabelIOWithReorient": ("R", "A", "S"), "SimpleITKIOWithReorient": ("R", "A", "S")}  # RAS first
DEFAULT_PATCH = (64, 128, 128)  # finetune.py's, pretraining order


def network_axes(codes) -> tuple[list[int], list[bool]]:
    """For nnU-Net's array axes with nibabel codes `codes` (the direction each axis runs to):
    the nnU-Net axis that each network axis (depth, rows, cols) reads, and which nnU-Net
    axes are flipped first."""
    axes, flips = [0, 0, 0], [False, False, False]
    for m, want in enumerate(NETWORK_CODES):
        for a, code in enumerate(codes):
            if code in (want, OPPOSITE[want]):
                axes[m], flips[a] = a, code != want
                break
        else:
            raise ValueError(f"axis codes {codes} have no axis along {want}/{OPPOSITE[want]}")
    return axes, flips


def nnunet_codes(stored_codes, reader: str, transpose_forward) -> list[str]:
    """The codes of nnU-Net's network-input axes: the file's axes (nibabel's x, y, z order) as
    its reader returns them (reversed), then permuted by the plans' `transpose_forward`."""
    if reader in REORIENTING_READERS:
        stored_codes = REORIENTING_READERS[reader]
    elif reader not in READERS_IN_STORED_ORDER:
        known = ", ".join(READERS_IN_STORED_ORDER + tuple(REORIENTING_READERS))
        raise ValueError(f"nnU-Net reader {reader!r}: its axis order is not known here (known: {known})")
    reversed_codes = list(stored_codes)[::-1]
    return [reversed_codes[t] for t in transpose_forward]


def dataset_orientation(images: list[str]) -> tuple[str, ...]:
    """The axis codes that every image shares; refuses a set stored in several orientations,
    naming them (nnU-Net reads arrays as stored, so no single mapping would fit)."""
    codes = {path: tuple(labelled.header_orientation(path)[2]) for path in images}
    counts = Counter(codes.values())
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        odd = [f"{os.path.basename(p)} ({''.join(c)})" for p, c in codes.items() if c != common]
        raise ValueError(
            f"the training images are stored in {len(counts)} orientations: most in {''.join(common)}, but {', '.join(odd[:5])}"
            f"{' ...' if len(odd) > 5 else ''}. nnU-Net reads arrays as stored: reorient them to one orientation, or set "
            "--reader SimpleITKIOWithReorient (or NibabelIOWithReorient for NIfTI), whose arrays are reoriented to RAS"
        )
    return next(iter(counts))


def desd_patch(patch, median_mm, spacing: float) -> list[int]:
    """`patch` (pretraining order) in multiples of the encoder's stride, cut to the median image
    (in mm, pretraining order) rounded up to the stride, but never to one voxel of the last
    stage (whose instance norms need two): then two strides deep."""
    out = []
    for side, stride, mm in zip(patch, STRIDE, median_mm):
        if side % stride:
            raise ValueError(f"patch {tuple(patch)} is not a multiple of the encoder's stride {STRIDE} (depth, rows, cols)")
        out.append(min(side, max(stride, math.ceil(mm / spacing / stride) * stride)))
    if out == list(STRIDE):
        out[0] *= 2
    return out


def desd_plans(
    plans: dict,
    codes,
    arch: str,
    plans_name: str = "nnUNetPlans_DeSD",
    configuration: str = "3d_fullres",
    spacing: float = 1.0,
    patch=DEFAULT_PATCH,
    reader: str = "",
) -> dict:
    """nnU-Net plans with one configuration, `configuration` of `plans` with the DeSD network,
    for images stored with axis codes `codes` (unused where `reader`, by default the plans',
    reorients), read by `reader`."""
    if configuration not in plans.get("configurations", {}):
        raise KeyError(
            f"the plans {plans.get('plans_name')!r} have no configuration {configuration!r} (found {sorted(plans.get('configurations', {}))})"
        )
    source = plans["configurations"][configuration]
    if len(source.get("patch_size", ())) != 3:
        raise ValueError(
            f"configuration {configuration!r} is {len(source.get('patch_size', ()))}-D; the DeSD network is 3-D: name a 3-D "
            "configuration (3d_fullres)"
        )
    if "inherits_from" in source:
        raise ValueError(
            f"configuration {configuration!r} inherits from {source['inherits_from']!r}; name a full configuration (3d_fullres)"
        )
    reader = reader or plans["image_reader_writer"]
    axes, flips = network_axes(nnunet_codes(codes, reader, plans["transpose_forward"]))
    median_mm = [n * s for n, s in zip(plans["original_median_shape_after_transp"], plans["original_median_spacing_after_transp"])]
    net_patch = desd_patch(patch, [median_mm[a] for a in axes], spacing)
    nn_patch = [0, 0, 0]
    for m, a in enumerate(axes):
        nn_patch[a] = net_patch[m]
    config = copy.deepcopy(source)
    config.update(
        data_identifier=f"{plans_name}_{configuration}",
        spacing=[spacing] * 3,
        patch_size=nn_patch,
        median_image_size_in_voxels=[round(mm / spacing) for mm in median_mm],
        normalization_schemes=["NoNormalization"] * len(source["normalization_schemes"]),
        use_mask_for_norm=[False] * len(source["use_mask_for_norm"]),
        architecture={
            "network_class_name": NETWORK,
            "arch_kwargs": {"arch": arch, "input_axes": axes, "input_flips": flips, "strides": ds_strides(axes)},
            "_kw_requires_import": [],
        },
    )
    out = copy.deepcopy(plans)
    out["plans_name"] = plans_name
    out["image_reader_writer"] = reader
    out["configurations"] = {configuration: config}
    return out


def convert_teacher(teacher: str, arch: str, out: str, seed: int = 0) -> int:
    """Write `teacher`'s backbone (ours or the released format; its arch must be `arch`) in the
    DeSD network's whole state as nnU-Net's `-pretrained_weights` file; returns the number of
    tensors written. Nothing is written when the teacher does not fit."""
    torch.manual_seed(seed)
    net = DeSDUNet(1, 2, arch=arch, deep_supervision=True)
    loaded, total = load_pretrained_encoder(net.encoder, teacher, arch=arch)
    state = {k: v for k, v in net.state_dict().items() if ".seg_layers." not in k}
    meta = {"arch": arch, "teacher": os.path.abspath(teacher), "encoder_tensors": loaded, "network": NETWORK}
    write_atomic(out, lambda tmp: torch.save({"network_weights": state, "desd": meta}, tmp))
    return len(state)


def check_network_resolves(name: str = NETWORK) -> None:
    """Resolve `name` as nnU-Net does (`pydoc.locate`) and refuse, naming the file found, where it
    is not this project's class: another `models` package earlier on the path would otherwise
    train a network other than the one these plans describe."""
    found = pydoc.locate(name)
    if found is None:
        raise SystemExit(f"{name} cannot be imported, so nnU-Net could not build the network: install this project (make install)")
    ours = os.path.realpath(inspect.getsourcefile(DeSDUNet))
    try:
        theirs = inspect.getfile(found)
    except TypeError:  # a built-in, or a class whose module is gone
        theirs = None
    if theirs is None or os.path.realpath(theirs) != ours:
        raise SystemExit(
            f"{name} resolves to {theirs or found!r}, not to this project's {ours}: another `models` package comes first on the "
            "path; run from a folder without one, or fix PYTHONPATH"
        )


# ============ commands ============


def dataset_folder(root_var: str, dataset: str) -> str:
    """The folder of dataset `dataset` (an id or a DatasetXXX_Name) under $`root_var`."""
    root = os.environ.get(root_var)
    if not root:
        raise SystemExit(f"${root_var} is not set; nnU-Net's commands need it too")
    name = dataset if dataset.startswith("Dataset") else None
    if name is None:
        if not dataset.isdigit():
            raise SystemExit(f"-d {dataset!r}: expected a dataset id (3) or name (Dataset003_Liver)")
        found = sorted(glob.glob(os.path.join(root, f"Dataset{int(dataset):03d}_*")))
        if len(found) != 1:
            raise SystemExit(
                f"dataset id {dataset} matches {len(found)} folders in ${root_var} ({root}): {[os.path.basename(f) for f in found]}"
            )
        return found[0]
    return os.path.join(root, name)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def read_json(path: str, hint: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found; {hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not valid JSON ({err}); is the file cut short? {hint}") from None


PLANS_KEYS = ("configurations", "transpose_forward", "image_reader_writer", "original_median_shape_after_transp")


def check_plans(plans: dict, path: str, hint: str) -> None:
    """Refuse plans that lack what the DeSD plans are made from, naming the file and the keys."""
    missing = [k for k in (*PLANS_KEYS, "original_median_spacing_after_transp") if k not in plans]
    if missing:
        raise SystemExit(f"{path}: not nnU-Net v2 plans, or damaged: no {', '.join(missing)}; {hint}")


def desd_plans_file(path: str) -> bool:
    try:
        with open(path) as f:
            configs = json.load(f).get("configurations", {})
        return any(c.get("architecture", {}).get("network_class_name") == NETWORK for c in configs.values())
    except (OSError, ValueError, AttributeError):
        return False


def desd_weights_file(path: str) -> bool:
    try:
        return "desd" in torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file at all: not ours
        return False


def plans_main(argv: list[str] | None = None) -> int:
    parser = command_parser("nnU-Net v2 plans for the DeSD network (and the teacher as its weights).")
    parser.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (Dataset003_Liver).")
    parser.add_argument("--arch", default="res3d50", choices=list_models(), help="The teacher's encoder.")
    parser.add_argument(
        "--pretrained", default="", help="DeSD teacher (checkpoint or export_teacher file) to convert for -pretrained_weights."
    )
    parser.add_argument("--weights_out", default="", help="Where to write it (default: <plans_name>_<arch>.pth beside the plans).")
    parser.add_argument("--source_plans", default="nnUNetPlans", help="The nnU-Net plans to start from.")
    parser.add_argument("--plans_name", default="nnUNetPlans_DeSD", help="Name of the new plans (a file name in the preprocessed folder).")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="The 3-D configuration of the source plans to adapt.")
    parser.add_argument("--spacing", default=1.0, type=positive_float, help="Isotropic spacing in mm; 1 mm is the pretraining spacing.")
    parser.add_argument("--patch_size", default=DEFAULT_PATCH, type=int, nargs=3, help="Patch (depth, rows, cols), pretraining order.")
    parser.add_argument(
        "--reader",
        default="",
        help="nnU-Net reader for the new plans (default: the source plans'); SimpleITKIOWithReorient takes any orientation.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write over plans or weights files that this tool did not write.")
    args = parser.parse_args(argv)
    if any(side % stride for side, stride in zip(args.patch_size, STRIDE)):
        parser.error(f"--patch_size {' '.join(map(str, args.patch_size))}: each side must be a multiple of the encoder's stride {STRIDE}")

    check_network_resolves()
    pre = dataset_folder("nnUNet_preprocessed", args.dataset)
    raw = dataset_folder("nnUNet_raw", os.path.basename(pre))
    try:
        path = files.name_inside(pre, f"{args.plans_name}.json", "--plans_name")
        source_path = files.name_inside(pre, f"{args.source_plans}.json", "--source_plans")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if os.path.realpath(path) == os.path.realpath(source_path):
        raise SystemExit(f"--plans_name {args.plans_name!r} is the source plans' name: the DeSD plans would replace {source_path}")
    weights = ""
    if args.pretrained:
        weights = args.weights_out or os.path.join(pre, f"{args.plans_name}_{args.arch}.pth")
    try:
        files.refuse_overwrite(path, desd_plans_file, "plans that desd-nnunet-plans wrote", args.overwrite)
        if weights:
            files.refuse_overwrite(weights, desd_weights_file, "a weights file that desd-nnunet-plans wrote", args.overwrite)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    hint = f"run `nnUNetv2_plan_and_preprocess -d {args.dataset} --no_pp` first"
    plans = read_json(source_path, hint)
    check_plans(plans, source_path, hint)
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        raise SystemExit(f"{raw}/dataset.json not found; is $nnUNet_raw the folder the plans were made from?")
    reader = args.reader or plans["image_reader_writer"]
    if reader in REORIENTING_READERS:
        codes = REORIENTING_READERS[reader]  # whatever the files' orientations
    else:
        codes = dataset_orientation([case["image"] for case in labelled.read_dataset(raw).cases])
    try:
        out = desd_plans(plans, codes, args.arch, args.plans_name, args.configuration, args.spacing, args.patch_size, reader)
    except (KeyError, ValueError) as err:
        raise SystemExit(f"{source_path}: {err}") from err
    if weights:
        try:
            n = convert_teacher(args.pretrained, args.arch, weights)
        except (KeyError, RuntimeError, ValueError) as err:
            raise SystemExit(str(err)) from err
        print(f"wrote {weights}: {n} tensors, the encoder from {args.pretrained}")
    write_atomic(path, lambda tmp: write_json(tmp, out))
    config = out["configurations"][args.configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    print(
        f"wrote {path}: {args.configuration} with {NETWORK} ({args.arch}), images {''.join(codes)} as {reader} reads them -> "
        f"network axes {kwargs['input_axes']} flipped {kwargs['input_flips']}, spacing {config['spacing']}, "
        f"patch {config['patch_size']}, NoNormalization, deep supervision at {len(DS_STRIDES) - 1} scales"
    )
    ds = os.path.basename(pre)
    print("next:")
    print(f"  nnUNetv2_preprocess -d {args.dataset} -plans_name {args.plans_name} -c {args.configuration}")
    weights_flag = f" -pretrained_weights {weights}" if weights else ""
    device = "" if torch.cuda.is_available() else " -device cpu"  # nnU-Net's commands default to CUDA
    print(f"  nnUNetv2_train {args.dataset} {args.configuration} 0 -p {args.plans_name}{weights_flag}{device}")
    print(
        f"  nnUNetv2_predict -i $nnUNet_raw/{ds}/imagesTs -o preds -d {args.dataset} -c {args.configuration} -p {args.plans_name} -f 0{device}"
    )
    return 0


def weights_main(argv: list[str] | None = None) -> int:
    parser = command_parser("A DeSD teacher as nnU-Net v2 -pretrained_weights.")
    parser.add_argument("teacher", help="DeSD checkpoint (ours or the released format) or export_teacher file.")
    parser.add_argument("out", help="The weights file to write.")
    parser.add_argument("--arch", default="res3d50", choices=list_models(), help="The teacher's encoder (must be the plans' arch).")
    args = parser.parse_args(argv)
    try:
        n = convert_teacher(args.teacher, args.arch, args.out)
    except (KeyError, RuntimeError, ValueError) as err:
        print(err, file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {n} tensors, the encoder from {args.teacher}")
    return 0


SHIM = "from downstream.nnunet_trainer import nnUNetTrainer_DeSD  # noqa: F401 - written by desd-nnunet-trainer\n"


def install_trainer(folder: str | None = None, overwrite: bool = False) -> str:
    """Write, into nnU-Net's trainer folder (`folder`, by default the installed nnunetv2's), the
    one-line module through which `-tr nnUNetTrainer_DeSD` finds downstream/nnunet_trainer.py:
    nnU-Net looks for trainers in its own package only. Returns the file written."""
    if folder is None:
        try:
            import nnunetv2
        except ImportError as err:
            raise RuntimeError(f"nnU-Net v2 is not installed here ({err}): pip install nnunetv2, then run this again") from None
        folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    path = os.path.join(folder, "nnUNetTrainer_DeSD.py")

    def ours(p: str) -> bool:
        with open(p) as f:
            return f.read() == SHIM

    files.refuse_overwrite(path, ours, "the module desd-nnunet-trainer writes", overwrite)
    write_atomic(path, lambda tmp: open(tmp, "w").write(SHIM))
    return path


def trainer_main(argv: list[str] | None = None) -> int:
    parser = command_parser("Make nnUNetTrainer_DeSD (nnU-Net's trainer, its length from DESD_NNUNET_*) findable by nnUNetv2_train -tr.")
    parser.add_argument("--folder", default=None, help="nnU-Net's trainer folder (default: the installed nnunetv2's).")
    parser.add_argument("--overwrite", action="store_true", help="Write over a file of that name that this tool did not write.")
    args = parser.parse_args(argv)
    print(f"wrote {install_trainer(args.folder, args.overwrite)}: nnUNetv2_train ... -tr nnUNetTrainer_DeSD now finds the trainer")
    return 0


plans_cli, weights_cli, trainer_cli = entry(plans_main), entry(weights_main), entry(trainer_main)  # the installed commands

if __name__ == "__main__":
    sys.exit(run_command(plans_main))
