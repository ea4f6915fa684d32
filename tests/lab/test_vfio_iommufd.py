"""iommufd / VFIO cdev detection on the lab's Debian kernel, which has neither."""
from __future__ import annotations

import os

import pytest

from pykvm.vfio.iommufd import detect

pytestmark = pytest.mark.lab


def test_reported_unavailable_with_the_reasons():
    support = detect()
    assert os.path.exists("/dev/vfio/vfio")  # the group/container API is there instead
    assert not support.available and not support.dev_iommu and support.vfio_cdevs == []
    text = support.describe()
    assert "/dev/iommu does not exist" in text and "/dev/vfio/devices/ has no VFIO device cdevs" in text
    assert "Use Container/Group instead" in text
