"""Token merging for Stable Diffusion (Bolya and Hoffman 2023, "Token Merging for Fast Stable
Diffusion"; AUTOMATIC1111's "Token merging ratio"). Before a transformer block's
self-attention, the tokens of its feature map that are most like another token are averaged
into it, attention runs on the fewer tokens left, and each merged token's output is copied back
to the places it came from ("unmerging"), so the block's output has every token again.

The matching is the paper's bipartite soft matching with a 2x2 stride: each 2x2 cell of the
feature map gives one destination token (at a place drawn at random on every call, the paper's
better choice), the other three are sources; each source's most similar destination is found
(cosine similarity of the block's input tokens) and the `ratio` x tokens sources most similar
to theirs are merged into them (an average with the destination and the other sources merged
there). At most every source can merge: ratios above 3/4 act as 3/4.

`TokenMerging` is one sampling run's setting (it draws the destinations with its own generator,
so a seed gives the same image each time); the UNet hands it to its transformers, and those at
its finest attention level (the most tokens; SD 1.5's 64x64 at 512 px, where self-attention
costs most) merge. Only the self-attention merges (the paper's and A1111's default: cross-
attention and the MLP see every token)."""
import torch
import torch.nn.functional as F


class TokenMerging:
    """The setting of one run: `ratio` in (0, 1), the share of a feature map's tokens merged
    away; `tokens`: the token count of the level that merges (set by the UNet per call)."""

    def __init__(self, ratio, seed=0):
        self.ratio, self.tokens = float(ratio), None
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def plan(self, x, height, width):
        """The merge for a block whose input is `x` (B, height * width, C): a Merge, or None
        where this block does not merge (not the finest attention level, or too few tokens)."""
        if x.shape[1] != self.tokens or height < 2 or width < 2:
            return None
        return Merge(x, height, width, int(x.shape[1] * self.ratio), self.generator)


class Merge:
    """Bipartite soft matching of the tokens of `x` (B, N, C) on its height x width grid,
    merging `r` of them. merge(y): (B, N, D) -> (B, N - r, D); unmerge(z): back to (B, N, D)."""

    def __init__(self, x, height, width, r, generator):
        B, N, _ = x.shape
        dst = _destinations(height, width, generator).to(x.device)  # (N,) bool
        self.dst_idx = dst.nonzero().squeeze(1)  # (Nd,)
        self.src_idx = (~dst).nonzero().squeeze(1)  # (Ns,)
        self.N, self.r = N, min(r, self.src_idx.numel())
        unit = F.normalize(x, dim=-1)
        scores = unit[:, self.src_idx] @ unit[:, self.dst_idx].transpose(1, 2)  # (B, Ns, Nd)
        best, target = scores.max(dim=-1)  # (B, Ns): each source's nearest destination
        order = best.argsort(dim=-1, descending=True)  # stable enough: ties are measure zero
        self.merged = order[:, :self.r]  # (B, r): sources merged away
        self.kept = order[:, self.r:]  # (B, Ns - r): sources kept
        self.target = target.gather(1, self.merged)  # (B, r): where each merges into

    def merge(self, y):
        """(B, N, D) -> (B, N - r, D): the kept sources, then the destinations with the merged
        sources averaged in."""
        src, dst = y[:, self.src_idx], y[:, self.dst_idx]
        D = y.shape[-1]
        kept = src.gather(1, _expand(self.kept, D))
        moving = src.gather(1, _expand(self.merged, D))
        dst = dst.scatter_reduce(1, _expand(self.target, D), moving, reduce="mean",
                                 include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, z):
        """(B, N - r, D) -> (B, N, D): every token gets its own output, a merged source its
        destination's."""
        B, _, D = z.shape
        n_kept = self.kept.shape[1]
        kept, dst = z[:, :n_kept], z[:, n_kept:]
        src = z.new_empty(B, self.src_idx.numel(), D)
        src.scatter_(1, _expand(self.kept, D), kept)
        src.scatter_(1, _expand(self.merged, D), dst.gather(1, _expand(self.target, D)))
        out = z.new_empty(B, self.N, D)
        out[:, self.dst_idx] = dst
        out[:, self.src_idx] = src
        return out


def _expand(index, D):
    return index[..., None].expand(-1, -1, D)


def _destinations(height, width, generator):
    """(height * width,) bool, row-major: one destination at a random place in each whole 2x2
    cell; rows and columns past the last whole cell are sources."""
    hc, wc = height // 2, width // 2
    pick = torch.randint(4, (hc, wc), generator=generator)  # place in the cell: dy * 2 + dx
    cells = torch.zeros(hc, wc, 4, dtype=torch.bool)
    cells.scatter_(2, pick[..., None], True)
    grid = torch.zeros(height, width, dtype=torch.bool)
    # (hc, wc, dy, dx) -> (hc, dy, wc, dx) -> rows hc * 2, columns wc * 2
    grid[:hc * 2, :wc * 2] = cells.view(hc, wc, 2, 2).permute(0, 2, 1, 3).reshape(hc * 2,
                                                                                  wc * 2)
    return grid.flatten()
