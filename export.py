"""Export a params pickle for deployment: a SavedModel and TFLite files (fp32, fp16, int8), checked.

    python export.py --trained_param runs/res56/trained_params.pkl --dataset cifar10 \
        --data_path ~/data/cifar-10-batches-py --out_dir runs/res56/export --eval --latency --json

Writes `<out_dir>/saved_model/`, `<out_dir>/model_<mode>.tflite` and the report `<out_dir>/export.json`
(sizes and gzip sizes; with --eval top-1 and logit differences against the TF model; with --latency
median LiteRT and TF latencies).
"""

from codebase.cli import guarded


@guarded
def main(argv=None):
    from codebase.export_cli import parse_args

    args = parse_args(argv)
    from codebase.export_cli import export  # builds the data and the net, after the flags are checked

    return export(args)


if __name__ == "__main__":
    main()
