"""The KubeSpan node: one trio program holding the device, discovery and the controller."""
