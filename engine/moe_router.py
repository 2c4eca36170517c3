"""Mixture-of-experts routers behind one interface: `router(x) -> Routing`.

The seed's API, kept: `HashRouter(num_experts=16)`, `assign = router(x)`,
`router.load_balance_std(assign)` and `router.expert_utilization(assign)` (every router has both
methods; the module functions of the same names do the same). The code lives in flat modules:

    routing_core      Routing, tokens per expert, top-k, Mixtral's rule, capacity and drops
    routing_hash      HashRouter (ids or LSH on hidden states), BalancedHashRouter
    routing_gated     TopKRouter (Mixtral), SwitchRouter, GShardRouter, ExpertChoiceRouter
    routing_deepseek  DeepSeekV3Router: group-limited top-k, selection bias, routed scaling
"""

from engine.routing_core import (Routing, RouterMetrics, apply_capacity, exact_factor,
                                 expert_capacity, expert_utilization, load_balance_std,
                                 relative_std, router_probs, top_k, topk_softmax_route)
from engine.routing_deepseek import DEEPSEEK_V3, BalanceStep, DeepSeekV3Router
from engine.routing_gated import ExpertChoiceRouter, GShardRouter, SwitchRouter, TopKRouter
from engine.routing_hash import (MAX_EXPERTS, BalancedHashRouter, HashRouter, lsh_bits,
                                 lsh_codes)

__all__ = ["DEEPSEEK_V3", "MAX_EXPERTS", "BalanceStep", "BalancedHashRouter", "DeepSeekV3Router",
           "ExpertChoiceRouter", "GShardRouter", "HashRouter", "Routing", "RouterMetrics",
           "SwitchRouter", "TopKRouter", "apply_capacity", "exact_factor", "expert_capacity",
           "expert_utilization", "load_balance_std", "lsh_bits", "lsh_codes", "relative_std",
           "router_probs", "top_k", "topk_softmax_route"]
