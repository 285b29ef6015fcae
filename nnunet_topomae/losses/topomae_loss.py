"""The TopoMAE objective: a weighted sum of the component losses (Gu et al. 2024).

    L = w_rec  (L_rec(vit) + L_rec(cnn))
      + w_topo (L_topo(I, I'_vit) + L_topo(I, I'_cnn))
      + w_sp   (L_sp(vit) + L_sp(cnn))
      + w_rc   L_rec_cons + w_sc L_sp_cons

Terms whose branch or head is absent (plain MAE, ablations) are skipped; a zero weight skips the
term's computation entirely. The weights are *interpretation* (the paper does not give them) and
come from the trainer's class attributes.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from nnunet_topomae.losses.consistency import reconstruction_consistency, spatial_consistency
from nnunet_topomae.losses.reconstruction import deep_supervision_masked_mse, masked_mse
from nnunet_topomae.losses.spatial import spatial_loss


class TopoMAELoss(nn.Module):
    def __init__(self, w_rec: float = 1.0, w_topo: float = 0.1, w_spatial: float = 0.1,
                 w_rec_consistency: float = 0.1, w_spatial_consistency: float = 0.1,
                 topo_loss: Optional[nn.Module] = None):
        super().__init__()
        self.w = dict(rec=w_rec, topo=w_topo, spatial=w_spatial, rec_cons=w_rec_consistency,
                      sp_cons=w_spatial_consistency)
        self.topo_loss = topo_loss if w_topo > 0 else None

    def forward(self, out: Dict[str, torch.Tensor], image: torch.Tensor,
                spatial_target: Optional[torch.Tensor] = None, topo_pairs=None,
                with_topo: bool = True) -> Dict[str, torch.Tensor]:
        """Returns every term (unweighted, for logging) and ``loss`` (weighted total).
        ``topo_pairs``: the inputs' persistence pairs if already computed (data-loading workers);
        ``with_topo=False`` skips the topological term this step (every-N-steps schedule)."""
        m = out["voxel_mask"]
        cnn = out.get("cnn_recon")
        cnn_full = (cnn[0] if isinstance(cnn, (list, tuple)) else cnn) if cnn is not None else None
        terms: Dict[str, torch.Tensor] = {"rec_vit": masked_mse(out["vit_recon"], image, m)}
        if cnn is not None:
            terms["rec_cnn"] = deep_supervision_masked_mse(cnn, image, m)
        if self.topo_loss is not None and with_topo:
            # one call for both branches, so all persistence computations of the step run in parallel
            recons = [out["vit_recon"]] + ([cnn_full] if cnn_full is not None else [])
            n = len(recons)
            per = self.topo_loss.per_volume(torch.cat(recons), torch.cat([image] * n),
                                            None if topo_pairs is None else list(topo_pairs) * n)
            for name, part in zip(("topo_vit", "topo_cnn"), per.chunk(n)):
                terms[name] = part.mean()
        if spatial_target is not None and self.w["spatial"] > 0:
            for branch in ("vit", "cnn"):
                if f"{branch}_coords" in out:
                    terms[f"spatial_{branch}"] = spatial_loss(out[f"{branch}_coords"], spatial_target)
        if cnn_full is not None and self.w["rec_cons"] > 0:
            terms["rec_consistency"] = reconstruction_consistency(out["vit_recon"], cnn_full, m)
        if "vit_coords" in out and "cnn_coords" in out and self.w["sp_cons"] > 0:
            terms["spatial_consistency"] = spatial_consistency(out["vit_coords"], out["cnn_coords"])

        weight_of = {"rec_vit": "rec", "rec_cnn": "rec", "topo_vit": "topo", "topo_cnn": "topo",
                     "spatial_vit": "spatial", "spatial_cnn": "spatial", "rec_consistency": "rec_cons",
                     "spatial_consistency": "sp_cons"}
        terms["loss"] = sum(self.w[weight_of[k]] * v for k, v in terms.items())
        return terms
