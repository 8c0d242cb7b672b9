"""The nnU-Net v2 side of the benchmark: plan a 2D configuration, then time nnU-Net's own predictor.

Imported only in the benchmark's worker processes (nnunetv2 is an optional dependency:
``pip install -e .[bench]``). Nothing here is trained: the network has nnU-Net's random
initialisation, which costs exactly as much to run as trained weights.

Planning (:func:`plan`) is nnU-Net's own: a throw-away raw dataset (``dataset.json`` pointing
at the benchmark volume and a label map on the same grid, twice, as two training cases) goes
through ``DatasetFingerprintExtractor`` and the default ``ExperimentPlanner``, exactly as
``nnUNetv2_plan_and_preprocess`` would do; only its ``2d`` configuration is used.

Prediction (:func:`predict`) builds the network from the plan (``get_network_from_plans``,
i.e. ``PlainConvUNet``) and runs ``nnUNetPredictor.predict_single_npy_array`` on the image read
with nnU-Net's ``SimpleITKIO``. That call includes nnU-Net's preprocessing (transpose, crop to
non-zero, z-score normalisation, resampling to the plan's spacing), the sliding window (tile
step 0.5, Gaussian weighting, mirroring of both in-plane axes when enabled, one tile per forward
as nnU-Net does, fp32 on a CPU, autocast on CUDA) and the conversion of the logits back to a
label map on the original grid (resampling, softmax/argmax, un-cropping). It excludes writing
the result file and nnU-Net's multi-process pipelining of several cases.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

DATASET = "Dataset900_LumbarBench"
LABELS = {"background": 0, "vertebral_body": 1, "intervertebral_disc": 2}


def _set_paths(root: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
        (root / name).mkdir(parents=True, exist_ok=True)


def plan(root: str, image: str, label: str) -> dict:
    """Fingerprint + default 2D plan for a dataset made of ``image``/``label``; returns the file paths."""
    root = Path(root)
    _set_paths(root)
    raw = root / "nnUNet_raw" / DATASET
    raw.mkdir(parents=True, exist_ok=True)
    ending = "".join(Path(image).suffixes) or ".mha"
    cases = {f"case{i:03d}": {"images": [str(Path(image).resolve())], "label": str(Path(label).resolve())}
             for i in range(2)}
    dataset_json = {"channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": len(cases),
                    "file_ending": ending, "dataset": cases}
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=1))

    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    t = time.perf_counter()
    DatasetFingerprintExtractor(DATASET, num_processes=1).run(overwrite_existing=True)
    planner = ExperimentPlanner(DATASET)
    plans = planner.plan_experiment()
    pre = root / "nnUNet_preprocessed" / DATASET
    return {"plans": str(pre / "nnUNetPlans.json"), "dataset_json": str(pre / "dataset.json"),
            "plan_s": time.perf_counter() - t, "config_2d": plans["configurations"]["2d"],
            "transpose_forward": plans["transpose_forward"]}


def _network(plans_manager, cm, dataset_json, device=None):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    lm = plans_manager.get_label_manager(dataset_json)
    return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                  cm.network_arch_init_kwargs_req_import, 1, lm.num_segmentation_heads,
                                  allow_init=True, deep_supervision=False)


def forward_flops(plans_file: str, dataset_json_file: str, shape) -> float:
    """FLOPs (2 x multiply-adds of convs/matmuls) of one forward of the planned 2D net on ``shape``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans_file)
    cm = pm.get_configuration("2d")
    dsj = json.loads(Path(dataset_json_file).read_text())
    with torch.device("meta"):
        net = _network(pm, cm, dsj).eval()
        x = torch.empty(tuple(shape))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return float(counter.get_total_flops())


def predict(plans_file: str, dataset_json_file: str, image: str, *, mirroring: bool, device: str = "cpu",
            calls: int = 1, seed: int = 0) -> dict:
    """Time ``calls`` predictions of ``image`` (the first one is the cold one)."""
    import resource

    import torch

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    torch.manual_seed(seed)
    pm = PlansManager(plans_file)
    cm = pm.get_configuration("2d")
    dsj = json.loads(Path(dataset_json_file).read_text())
    net = _network(pm, cm, dsj)
    shapes = []
    net.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
    dev = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    # nnU-Net's 2D trainer allows mirroring along both in-plane axes
    predictor.manual_initialization(net, pm, cm, [net.state_dict()], dsj, "nnUNetTrainer",
                                    inference_allowed_mirroring_axes=(0, 1))
    out = {"patch_size": list(cm.patch_size), "batch_size_plan": cm.batch_size, "spacing_2d": list(cm.spacing),
           "arch": {k: v for k, v in cm.network_arch_init_kwargs.items()
                    if k in ("n_stages", "features_per_stage", "strides", "kernel_sizes",
                             "n_conv_per_stage", "n_conv_per_stage_decoder")},
           "calls": []}
    for i in range(calls):
        shapes.clear()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        data, props = SimpleITKIO().read_images([image])
        t_read = time.perf_counter() - t0
        seg = predictor.predict_single_npy_array(data, props, None, None, False)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        out["calls"].append({"wall_s": wall, "read_s": t_read,
                             "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)})
        if i == 0:
            out["forward_shapes"] = [list(s) for s in shapes]
            out["seg_shape"] = list(seg.shape)
            out["input_shape"] = list(data.shape)
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out
