"""``lowrank export-gguf ADAPTER_DIR out.gguf [--base MODEL]``: a PEFT LoRA adapter as llama.cpp's LoRA GGUF
(``llama-cli -m model.gguf --lora out.gguf``), or with ``--merge`` the base with the adapter merged in as a
model GGUF that llama.cpp runs alone. The math and the refusals live in ``tuners/lora/gguf_export.py``.
"""
from __future__ import annotations

from .cli import printable as _p


def add_arguments(parser):
    parser.add_argument("adapter", help="the PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--base", help="the base model's transformers folder (config.json; its weights too with "
                                       "--merge); default: the adapter's base_model_name_or_path")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="the adapter's tensor type in the file (default float32)")
    parser.add_argument("--merge", action="store_true", help="write the base with the adapter merged in, as a model")
    parser.add_argument("--type", choices=("f16", "q8_0", "f32"), default="f16", dest="merge_type",
                        help="with --merge: the matrices' type (default f16; norms stay float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from ..tuners.lora.gguf_export import export_gguf_adapter, export_merged_gguf
    if args.merge:
        done = export_merged_gguf(args.adapter, args.out, args.base, args.merge_type, overwrite=args.overwrite)
        tokenizer = "with the base's tokenizer" if done["tokenizer"] else "no tokenizer.json in the base: no tokenizer"
        print(f"wrote {_p(args.out)}: merged {done['architecture']} model, {done['dtype']}, {tokenizer}")
    else:
        done = export_gguf_adapter(args.adapter, args.out, args.base, args.dtype, overwrite=args.overwrite)
        print(f"wrote {_p(args.out)}: {done['pairs']} LoRA pairs for {done['architecture']}, alpha {done['alpha']:g}, "
              f"{done['dtype']} (llama-cli -m MODEL.gguf --lora {_p(args.out)})")
    return 0
