"""Train or compress a network on ImageNet from the standard TFRecord shards.

    python train_imagenet.py --arch ResNet-50 --data_path /data/imagenet/tfrecords \
        --gpu_id 0,1,2,3 --train_path runs/res50
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}' \
        python train_imagenet.py ...   # one process per machine: MultiWorkerMirroredStrategy

See docs/usage.md for runs, chains and every flag; `--config FILE` reads them from JSON.
"""

from codebase.cli import training_main

SCRIPT = dict(arch="ResNet-50", dataset="imagenet", train_path="runs/resnet50_imagenet")

main = training_main(SCRIPT, __doc__.splitlines()[0])

if __name__ == "__main__":
    main()
