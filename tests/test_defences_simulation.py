"""The defences in a real (tiny) federation: honest clients trained by the loop are never rejected by the bounds the
loop supplies; an attacker injected through `update_transform` is rejected (a scaled update) or capped (inflated
counts)."""

from fcmoe_hf.federated.attacks import attack_clients, inflate_counts, sign_flip_update

from .test_simulation import make_simulation


def test_attacked_federation_rejects_or_caps_only_the_attacker(tmp_path):
    simulation = make_simulation(tmp_path, num_rounds=2)
    bounds = simulation.update_bounds(simulation.client_ids)
    assert bounds.max_activations_per_sample == 32 * 1 * 2 * 2.0  # max_length x epochs x top_k x slack
    flip = attack_clients({"client_1": lambda u: sign_flip_update(u, 100.0)}, rounds={1})
    inflate = attack_clients({"client_2": lambda u: inflate_counts(u, 1e6, num_samples=u.num_samples)}, rounds={2})
    simulation.update_transform = lambda r, cid, u: inflate(r, cid, flip(r, cid, u))
    history = simulation.run()
    reasons = [{r["client_id"]: r["reason"] for r in metrics["rejected"]} for metrics in history]
    assert list(reasons[0]) == ["client_1"] and "norm_bound_factor" in reasons[0]["client_1"]
    capped = [{c["client_id"]: c["reason"] for c in metrics["capped"]} for metrics in history]
    assert capped[0] == {} and reasons[1] == {} and list(capped[1]) == ["client_2"]
    assert "activation_counts" in capped[1]["client_2"] and "scaled from" in capped[1]["client_2"]
    assert history[1]["server_num_capped"] == 1 and history[1]["server_num_clients"] == len(simulation.client_ids)
