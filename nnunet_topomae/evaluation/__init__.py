"""Segmentation evaluation beyond Dice: HD95, normalised surface Dice and Betti-number (topology) errors.

``metrics``   pure functions on numpy masks and spacing (``hd95``, ``nsd``, ``betti_numbers``,
              ``betti_errors``); conventions in its docstring.
``evaluate``  ``evaluate_folders`` (nnU-Net's folder evaluation extended by those metrics) and
              ``add_parser`` (the ``nnunet-topomae evaluate`` subcommand).

Nothing heavy is imported here: the CLI imports ``evaluate`` while it builds its parser.
"""
