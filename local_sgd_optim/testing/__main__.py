"""One rank of :func:`local_sgd_optim.testing.run_under_torchrun`, started by torchrun."""

import sys

from local_sgd_optim.testing.torchrun import main

if __name__ == "__main__":
    main(sys.argv[1:])
