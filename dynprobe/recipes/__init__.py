"""Model definitions and training recipes of the two-phase paper (CIFAR-10 VGG-16, ResNet-20)."""
