"""python -m opo_kernels.demo (see the package docstring)."""

from . import main

if __name__ == "__main__":
    main()
