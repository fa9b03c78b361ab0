"""The runtime the whole stack (selftok, vlm, rl) uses: typed configs, the command line, run directories and
checkpoints, image grids."""
