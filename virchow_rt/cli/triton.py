"""``virchow-rt triton``: an export -> a Triton Inference Server model repository entry."""

from __future__ import annotations

import argparse

from virchow_rt.cli.common import Help, add_engine_host_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    from virchow_rt.serve.triton import INSTANCE_KINDS, PLATFORMS

    p = sub.add_parser(
        "triton",
        formatter_class=Help,
        help="an export -> a Triton Inference Server model repository entry (config.pbtxt + model)",
    )
    p.add_argument(
        "export_dir",
        metavar="EXPORT",
        help="a folder written by `virchow-rt export`, or one .onnx/.engine file of it (that one is placed)",
    )
    p.add_argument("repo", metavar="REPO", help="the model repository; REPO/<name> is written")
    p.add_argument("--name", default=None, help="the model's name in Triton (default: the variant)")
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="auto",
        help="auto: the TensorRT engines when the export has any (and no --precision is given), else ONNX",
    )
    p.add_argument("--precision", default=None, help="which ONNX model: fp32 (the default), fp16 or int8")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument(
        "--instance-kind",
        choices=INSTANCE_KINDS,
        default="auto",
        help="where instances run; auto: the GPU, except for the int8 ONNX model (made for the CPU)",
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="dynamic batching: how long a request may wait for others to fill a batch",
    )
    add_engine_host_code(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from virchow_rt.serve.triton import HOST_CODE_FLAG, needs_host_code, write_triton_repository

    target = write_triton_repository(
        args.export_dir,
        args.repo,
        name=args.name,
        platform=args.platform,
        precision=args.precision,
        instances=args.instances,
        instance_kind=args.instance_kind,
        max_queue_delay_us=args.max_queue_delay_us,
        allow_engine_host_code=args.allow_engine_host_code,
    )
    flag = f" {HOST_CODE_FLAG}" if needs_host_code(target) else ""
    print(f"Triton model: {target} (serve with: tritonserver --model-repository {target.parent}{flag})")
    if flag:
        print(
            f"its engines are version-compatible: Triton loads them only with{flag}, which lets every engine "
            "in that repository run the native code stored in it; keep only engines you trust there"
        )
    print(
        f"Triton takes tiles of exactly the export's size (tile_size in {target / 'config.pbtxt'}): "
        "its graph does not resize; `virchow-rt serve` does"
    )
    return 0
