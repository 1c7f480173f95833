import torch

from divrl.objectives import clipped_policy_loss, group_advantages


def test_group_advantages_of_a_known_reward_vector():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0, 0, 0]).std()  # unbiased std of the first group
    expected_first = (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-6)
    torch.testing.assert_close(adv[:4], expected_first)
    assert torch.all(adv[4:] == 0)  # equal rewards: no signal
    mean_only = group_advantages(rewards, group_size=4, normalize=False)
    torch.testing.assert_close(mean_only[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_clipped_loss_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_policy_loss(new, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0, ρ=1.5 > 1.28 → clipped to 1.28; A<0, ρ=1.5 → min picks unclipped −1.5·(−1)... = 1.5
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_on_policy_gradient_is_reinforce():
    logits = torch.randn(5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[torch.tensor([0, 2])]
    adv = torch.tensor([1.0, -0.5])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, 0.2, 0.28)
    (grad,) = torch.autograd.grad(loss.sum(), logits, retain_graph=True)
    (expected,) = torch.autograd.grad(-(adv * logp).sum(), logits)
    torch.testing.assert_close(grad, expected)
