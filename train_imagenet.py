"""Train or compress a network on ImageNet from the standard TFRecord shards.

    python train_imagenet.py --arch ResNet-50 --data_path /data/imagenet/tfrecords \
        --gpu_id 0,1,2,3 --train_path runs/res50
    TF_CONFIG='{"cluster": {"worker": ["host1:2222", "host2:2222"]}, "task": {"type": "worker", "index": 0}}' \
        python train_imagenet.py ...   # one process per machine: MultiWorkerMirroredStrategy

See docs/usage.md for every flag; `--config FILE` reads flags from JSON.
"""

from codebase.cli import training_main
from codebase.config import Config

PRESET = Config(arch="ResNet-50", dataset="imagenet", train_path="runs/resnet50_imagenet", learning_rate=0.1,
                batch_size=256, val_batch_size=250, train_epoch=90, decay_points=(0.33, 0.67, 0.89),
                decay_rate=0.1, weight_decay=1e-4)

main = training_main(PRESET, __doc__.splitlines()[0])

if __name__ == "__main__":
    main()
