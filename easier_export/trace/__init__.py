"""Tracing to torch.fx (``tracing``), the rectifier table (``rectifiers``), finding call sites (``sites``) and
editing them: remove, blend, settle, swap (``edits``)."""
