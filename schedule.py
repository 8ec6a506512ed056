"""
The capacity schedule of routed training: how many tokens each routed part runs at
each step. c_bar(step) warms up at 1.0, anneals to its end value and holds; per-part
capacities are taken from where the similarity labels put the skipping (or rescaled
uniformly, as DLO's official code does); DLO's dynamic LR follows them (arXiv
2407.11030, sections 3.4 and 4.1). Its state lives in checkpoints, so a resumed run
continues the same schedule.
"""
import torch


SPLITS = ("labels", "rescale")


class CapacitySchedule:
    """Global capacity c_bar(step), and one capacity per routed part.

    c_bar: `start` for the first `warmup` steps (1.0: nothing skipped while the routers
    learn the labels), linear to `end` over the next `anneal` steps, then `end`. DLO
    anneals 1.0 -> 0.9 over 1,000 steps (arXiv 2407.11030, section 4.1).

    Per-part capacities, split="labels" (default): the labels are computed at the end
    capacity from step 0, and their per-part fractions f_l (an exponential moving
    average) say where skipping belongs. Part l gets c_l = 1 - a * (1 - f_l), with a
    chosen so the mean is c_bar: capacity is taken only where the labels put it, and a
    part whose labels say "run every token" keeps c_l = 1. (Below the labels' own mean,
    as evaluate.py --calibrate may ask for, c_l = f_l * c_bar / mean f.)
    split="rescale" is DLO's official code: labels at the current c_bar, then every
    c_l = f_l * c_bar(next) / mean f, which also lowers layers labelled "run all".

    groups: each part's capacity group (default: one group), and `end` one capacity per
    group: e.g. inserted blocks at 0.3 and the original layers' attention at 0.8. Each
    group anneals to its own end, and its labels and split stay among its own parts.
    """

    def __init__(self, n_layers, start=1.0, end=0.9, warmup=0, anneal=1000, split="labels", momentum=0.9,
                 groups=None):
        self.n_layers, self.start, self.warmup, self.anneal = n_layers, start, warmup, anneal
        self.groups = list(groups) if groups is not None else [0] * n_layers
        self.ends = list(end) if isinstance(end, (list, tuple)) else [end] * (max(self.groups, default=0) + 1)
        self.split, self.momentum = split, momentum
        self.label_frac = None   # (n_layers,) float64, on the CPU

    def global_capacity(self, step, group=0):
        if step < self.warmup:
            return self.start
        progress = 1.0 if self.anneal <= 0 else min(1.0, (step - self.warmup) / self.anneal)
        return self.start + (self.ends[group] - self.start) * progress

    def label_capacity(self, step):
        """The capacity each group's labels are computed at."""
        return [end if self.split == "labels" else self.global_capacity(step, g) for g, end in enumerate(self.ends)]

    def update(self, label_frac):
        """Fold one step's per-part label fractions into the running estimate."""
        f = label_frac.detach().double().cpu()
        if self.split == "rescale" or self.label_frac is None:
            self.label_frac = f
        else:
            self.label_frac = self.momentum * self.label_frac + (1 - self.momentum) * f

    def capacities(self, step):
        """(n_layers,) float64 per-part capacities for this step's top-k."""
        caps = torch.empty(self.n_layers, dtype=torch.float64)
        for g in sorted(set(self.groups)):
            members = torch.tensor([i for i, group in enumerate(self.groups) if group == g], dtype=torch.long)
            f = None if self.label_frac is None else self.label_frac[members]
            caps[members] = self.split_capacity(self.global_capacity(step, g), f, len(members))
        return caps

    def split_capacity(self, c_bar, f, n):
        if f is None or float(f.mean()) >= 1.0:
            return torch.full((n,), c_bar, dtype=torch.float64)
        if self.split == "rescale" or c_bar < float(f.mean()):   # below the labels' own capacity: scale them
            return (f * c_bar / f.mean()).clamp(0.0, 1.0)
        a = (1.0 - c_bar) / float(1.0 - f.mean())
        return 1.0 - a * (1.0 - f)

    def state_dict(self):
        return {"label_frac": None if self.label_frac is None else self.label_frac.tolist()}

    def load_state_dict(self, state):
        f = state.get("label_frac")
        self.label_frac = None if f is None else torch.tensor(f, dtype=torch.float64)


def part_schedule(slots, start, end, attn_end=0.0, **options):
    """The CapacitySchedule of routed parts `slots` ((layer, part) pairs): one group at
    `end`, or, with attn_end > 0, the attention parts in a group of their own at attn_end."""
    apart = attn_end > 0 and any(part == "attn" for _, part in slots)
    groups = [int(apart and part == "attn") for _, part in slots]
    return CapacitySchedule(len(slots), start, [end, attn_end] if apart else end, groups=groups, **options)


def dynamic_lr_scales(caps):
    """DLO's "dynamic LR" (section 3.4): layer l's LR is multiplied by c_l + (1 - mean c),
    which follows each layer's capacity while keeping the mean multiplier at 1."""
    caps = [float(c) for c in caps]
    mean = sum(caps) / len(caps)
    return [c + (1.0 - mean) for c in caps]
