"""``python -m local_sgd_optim.plan``: see :func:`local_sgd_optim.plan.main`."""

from local_sgd_optim.plan.cli import main

if __name__ == "__main__":
    main()
