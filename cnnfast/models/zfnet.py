"""ZFNet (Zeiler & Fergus 2013, "Visualizing and Understanding Convolutional Networks")."""
import torch
from torch import nn


class ZFNet(nn.Module):
    """ZFNet as the lecture describes it, laid out like torchvision's AlexNet.

    The lecture's changes to AlexNet: conv1 is 7x7 stride 2 instead of 11x11 stride 4, and
    conv3/4/5 have 512/1024/512 filters instead of 384/384/256. The rest follows the paper:

    ============  ==========================  ======  ===============
    layer         operation                   pad     output (224x224)
    ============  ==========================  ======  ===============
    features.0    conv 96, 7x7, stride 2      1       96 x 110 x 110
    features.2    max pool 3x3, stride 2      ceil    96 x 55 x 55
    features.3    conv 256, 5x5, stride 2     0       256 x 26 x 26
    features.5    max pool 3x3, stride 2      ceil    256 x 13 x 13
    features.6    conv 512, 3x3, stride 1     1       512 x 13 x 13
    features.8    conv 1024, 3x3, stride 1    1       1024 x 13 x 13
    features.10   conv 512, 3x3, stride 1     1       512 x 13 x 13
    features.12   max pool 3x3, stride 2      ceil    512 x 6 x 6
    avgpool       adaptive average to 6x6             512 x 6 x 6
    classifier.1  linear 18432 -> 4096                4096
    classifier.4  linear 4096 -> 4096                 4096
    classifier.6  linear 4096 -> num_classes          num_classes
    ============  ==========================  ======  ===============

    Every conv and hidden linear layer is followed by a ReLU; dropout precedes the two hidden
    linear layers, as in torchvision's AlexNet, so the state_dict keys line up with it.

    Padding: the paper gives the sizes 110, 55, 26, 13, 6 without the paddings. Padding conv1
    by 1 gives 110; the pools round up (``ceil_mode``, as the Caffe-era implementations did),
    which gives 55 and 13 where rounding down would give 54 and 12.

    Local response normalisation is omitted: it has no weights and negligible FLOPs, and
    torchvision's AlexNet dropped it too.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.Conv2d(96, 256, kernel_size=5, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            nn.Conv2d(256, 512, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 1024, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 512, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(512 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)
