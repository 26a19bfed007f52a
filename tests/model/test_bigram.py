import torch

from model.bigram import HEAD_DIM, HEAD_SIGN_ROWS, HEAD_TABLE_ROWS, BigramEmbedding, sign_table


def test_head_sizes():
    assert (HEAD_TABLE_ROWS, HEAD_DIM, HEAD_SIGN_ROWS) == (377_280, 768, 8192)


def test_sign_table_is_the_sign_of_a_float32_normal_draw():
    table = sign_table(8, 16, torch.Generator().manual_seed(5))
    draws = torch.randn(8, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float32).tolist()
    assert table.dtype == torch.bfloat16 and table.shape == (8, 16)
    for i in range(8):
        for j in range(16):
            d = draws[i][j]
            assert table[i, j].item() == (1.0 if d > 0 else -1.0 if d < 0 else 0.0)
    assert (table == 1).any() and (table == -1).any()


def test_sign_table_uses_the_global_generator_by_default():
    torch.manual_seed(123)
    first = sign_table(4, 8)
    torch.manual_seed(123)
    draws = torch.randn(4, 8)
    assert torch.equal(first.float(), torch.where(draws > 0, 1.0, -1.0))


def test_lookup_is_the_signed_table_row():
    embedding = BigramEmbedding(rows=11, dim=4, sign_rows=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedding.table.copy_(torch.arange(44, dtype=torch.float32).view(11, 4) - 20)
    hash_ids = torch.tensor([[10, 0, 3], [3, 7, 7]])
    sign_ids = torch.tensor([[0, 2, 1], [1, 1, 0]])
    out = embedding(hash_ids, sign_ids)
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            h, s = hash_ids[b, t].item(), sign_ids[b, t].item()
            for d in range(4):
                expected = (h * 4 + d - 20) * embedding.signs[s, d].item()
                assert out[b, t, d].item() == expected


def test_zero_at_init_and_gradients_reach_only_looked_up_rows_signed():
    embedding = BigramEmbedding(rows=6, dim=3, sign_rows=2, generator=torch.Generator().manual_seed(1))
    assert not embedding.table.any()
    hash_ids, sign_ids = torch.tensor([1, 4, 1]), torch.tensor([0, 1, 1])
    out = embedding(hash_ids, sign_ids)
    assert not out.any()
    out.sum().backward()
    grad = embedding.table.grad
    signs = embedding.signs.float()
    for row in range(6):
        expected = sum((signs[s] for h, s in zip(hash_ids.tolist(), sign_ids.tolist()) if h == row), torch.zeros(3))
        assert torch.equal(grad[row], expected)


def test_signs_are_state_but_not_a_parameter():
    embedding = BigramEmbedding(rows=5, dim=2, sign_rows=4)
    assert set(embedding.state_dict()) == {"table", "signs"}
    assert [name for name, _ in embedding.named_parameters()] == ["table"]
    copy = BigramEmbedding(rows=5, dim=2, sign_rows=4)
    copy.load_state_dict(embedding.state_dict())
    assert torch.equal(copy.signs, embedding.signs)
