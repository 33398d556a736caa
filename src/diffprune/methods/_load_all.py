"""Import every module of this package, so that each built-in method registers itself (`@register`).

A new method is one new file here with a registered class: nothing else lists it.
"""
import importlib
import pkgutil

_NOT_METHODS = {"base", "sparse", "_load_all"}  # the interface and shared code, no methods of their own
_package = importlib.import_module(__package__)
for _info in pkgutil.iter_modules(_package.__path__):
    if _info.name not in _NOT_METHODS:
        importlib.import_module(f"{__package__}.{_info.name}")
