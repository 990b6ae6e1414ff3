"""Interoperability with other frameworks. `fgrad.interop.torch` needs PyTorch installed."""
