"""Conformance rows of Compacter, Compacter++ and the PHM adapter.

Each adapter has a down PHM layer d→m and an up PHM layer m→d, each with a bias. With n = phm_dim and
r = phm_rank the fast weights of a PHM layer k x d cost r(k + d) when factorised (n slices of
s_i: k/n x r and t_i: d/n x r) and kd/n when not (n slices of B_i: k/n x d/n); the slow weights A cost
n³ once per model when shared, else n³ per PHM layer. Compacter and the PHM adapter place two adapters
per decoder layer, Compacter++ one.
"""

from efficientgpt.peft.compacter import CompacterConfig, PHMAdapterConfig
from rows import Row


def _fast(k, d, cfg):
    n, r = cfg.phm_dim, cfg.phm_rank
    return r * (k + d) if cfg.factorized_phm else k * d // n


def _count(model, cfg, per_layer):
    d, m, n = model.config.hidden_size, cfg.bottleneck, cfg.phm_dim
    per_adapter = _fast(m, d, cfg) + _fast(d, m, cfg) + m + d + (0 if cfg.shared_phm_rule else 2 * n**3)
    return per_layer * model.config.num_hidden_layers * per_adapter + (n**3 if cfg.shared_phm_rule else 0)


ROWS = {
    "compacter": Row(config=lambda family: CompacterConfig(bottleneck=8, phm_rank=2),
                     count=lambda model, cfg: _count(model, cfg, 2)),
    "compacter_pp": Row(config=lambda family: CompacterConfig(bottleneck=8),
                        count=lambda model, cfg: _count(model, cfg, 1)),
    "phm_adapter": Row(config=lambda family: PHMAdapterConfig(bottleneck=8),
                       count=lambda model, cfg: _count(model, cfg, 2)),
}
