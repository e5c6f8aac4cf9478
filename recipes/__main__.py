"""``python -m recipes {fit,validate,test,predict} --config ...``: see :mod:`recipes.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
