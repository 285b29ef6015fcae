# This folder is what ``nnUNet_extTrainer`` points at (see ``nnunet-topomae env``). nnU-Net imports
# its modules as top-level modules and forgets them afterwards, so they hold only re-exports.
