"""The compiled extension: importing it registers the ``torch.ops.fused_nce`` ops."""
