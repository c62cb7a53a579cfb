"""The training recipes (run them as scripts: ``accelerate launch recipes/train_cifar10.py``)."""
