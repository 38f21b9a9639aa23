"""Device drivers of qkdnode: one module per device family, each speaking one real protocol."""
