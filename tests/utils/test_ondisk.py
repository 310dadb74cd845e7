"""Counts read from disk give the same batches, splits and training as counts in memory."""

from __future__ import annotations


import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from step.functionality.comps.trainer import Trainer, seed_everything
from step.models import TranscriptFormer
from step.utils.block_sampler import BlockBatchSampler
from step.utils.dataset import ScDataset, index_loader
from step.utils.ondisk import OnDiskDataset



@pytest.fixture(scope="module")
def pbmc_files(tmp_path_factory, _pbmc_counts_session, write_store):
    root = tmp_path_factory.mktemp("ondisk")
    adata = _pbmc_counts_session.copy()
    adata.layers["counts"] = adata.X.copy()
    return adata, write_store(adata, root / "pbmc.h5ad"), write_store(adata, root / "pbmc.zarr")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["h5ad", "zarr", "backed"])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_batches_from_disk_equal_batches_from_memory(pbmc_files, kind, layer):
    adata, h5ad, zarr = pbmc_files
    source = {"h5ad": h5ad, "zarr": zarr, "backed": None}[kind]
    if source is None:
        source = ad.read_h5ad(h5ad, backed="r")
    disk = OnDiskDataset(source, layer=layer, batch_key="phase", class_key="bulk_labels", mode="class")
    mem = ScDataset(adata, layer=layer, batch_key="phase", class_key="bulk_labels", mode="class")
    assert len(disk) == len(mem) and disk.n_genes == mem.n_genes
    assert disk.obs.equals(mem.obs) and disk.var_names.equals(mem.var_names)
    assert disk.batch_categories == mem.batch_categories and disk.class_categories == mem.class_categories
    np.testing.assert_array_equal(disk.library, mem.library)
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(len(mem))[:97], np.array([5, 3, 3, 699, 0]), np.arange(100, 164)):
        assert _same(disk[idx], mem[idx])
    assert _same(disk[7], mem[7])
    view_d, view_m = disk.subset(np.arange(50, 400)), mem.subset(np.arange(50, 400))
    assert len(view_d) == 350 and _same(view_d[[0, 9, 2]], view_m[[0, 9, 2]])
    assert (view_d.X != view_m.X).nnz == 0
    for bd, bm in zip(index_loader(disk, 128, seed=3), index_loader(mem, 128, seed=3), strict=True):
        assert _same(bd, bm)


def test_split_and_predict_work_unchanged(pbmc_files):
    adata, h5ad, _ = pbmc_files
    disk, mem = OnDiskDataset(h5ad), ScDataset(adata)
    seed_everything(0)
    trainer = Trainer(TranscriptFormer(disk.n_genes, hidden_dim=16, n_modules=8, module_dim=8, n_heads=2),
                      seed=0, verbose=False)
    (td, vd), (tm, vm) = (trainer.make_loaders(d, 64, obs_key="bulk_labels", seed=1) for d in (disk, mem))
    np.testing.assert_array_equal(td.dataset.indices, tm.dataset.indices)
    np.testing.assert_array_equal(vd.dataset.indices, vm.dataset.indices)
    np.testing.assert_array_equal(trainer.predict(disk), trainer.predict(mem))


def _losses(dataset, block_size=None):
    seed_everything(0)
    model = TranscriptFormer(dataset.n_genes, hidden_dim=16, n_modules=8, module_dim=8, n_heads=2)
    trainer = Trainer(model, seed=0, verbose=False)
    trainer.init_optimizer(lr=1e-3)
    trainer.train_batch(2, trainer.make_loaders(dataset, 128, split_rate=0.2, seed=0, block_size=block_size))
    return trainer.history


@pytest.mark.parametrize("block_size", [None, 32])
def test_training_from_disk_matches_memory(pbmc_files, block_size):
    adata, h5ad, _ = pbmc_files
    disk, mem = _losses(OnDiskDataset(h5ad), block_size), _losses(ScDataset(adata), block_size)
    cols = [c for c in mem.columns if c.endswith("loss")]
    assert cols
    np.testing.assert_allclose(disk[cols].to_numpy(float), mem[cols].to_numpy(float), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- block sampler
def test_block_sampler_covers_every_row_once_in_random_blocks():
    n, bs = 1000, 64
    sampler = BlockBatchSampler(n, bs, block_size=50, buffer_blocks=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 16 and all(b.dtype == np.int64 for b in batches)
    order = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(order, np.arange(n))
    assert not np.array_equal(order, np.sort(order))
    # each buffer of 4 blocks holds 200 rows from 4 contiguous ranges
    for start in range(0, n, 200):
        assert len(np.unique(order[start : start + 200] // 50)) == 4
    # a second epoch draws another order; drop_last drops the short batch
    assert not np.array_equal(np.concatenate(list(sampler)), order)
    assert len(list(BlockBatchSampler(n, bs, block_size=50, drop_last=True))) == n // bs


@pytest.mark.parametrize(("n", "bs", "block", "buffer", "drop_last"),
                         [(1000, 64, 50, 4, False), (1000, 64, 50, 4, True), (97, 10, 7, 3, False),
                          (97, 10, 7, 3, True), (64, 64, 8, 2, False), (5, 16, 2, 1, False)])
def test_block_sampler_streams_the_cuts_of_its_epoch_order(n, bs, block, buffer, drop_last):
    """Batches come buffer by buffer, equal to cutting the whole epoch's order."""
    streamed = BlockBatchSampler(n, bs, block_size=block, buffer_blocks=buffer,
                                 drop_last=drop_last, seed=3)
    whole = BlockBatchSampler(n, bs, block_size=block, buffer_blocks=buffer,
                              drop_last=drop_last, seed=3)
    for _ in range(2):  # two epochs: the generator advances the same way
        batches, order = list(streamed), whole.order()
        assert len(batches) == len(streamed)
        expected = [order[i:i + bs] for i in range(0, len(streamed) * bs, bs)][:len(streamed)]
        assert len(batches) == len(expected)
        for got, want in zip(batches, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_block_sampler_is_reproducible_from_its_generator():
    a = BlockBatchSampler(300, 32, block_size=16, seed=5)
    b = BlockBatchSampler(300, 32, block_size=16, seed=5)
    first = np.concatenate(list(a))
    np.testing.assert_array_equal(first, np.concatenate(list(b)))
    a.generator.manual_seed(11)
    b.generator.manual_seed(11)
    np.testing.assert_array_equal(np.concatenate(list(a)), np.concatenate(list(b)))
    state = a.state_dict()
    again = np.concatenate(list(a))
    a.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate(list(a)), again)
    np.testing.assert_array_equal(np.concatenate(list(BlockBatchSampler(30, 8, shuffle=False))), np.arange(30))


def test_index_loader_chooses_the_block_sampler(pbmc_files):
    disk = OnDiskDataset(pbmc_files[1])
    loader = index_loader(disk, 100, block_size=25, buffer_blocks=2, seed=0)
    assert isinstance(loader.sampler, BlockBatchSampler)
    seen = np.concatenate([b["index"].numpy() for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(len(disk)))
    with pytest.raises(ValueError, match="block_size"):
        index_loader(disk, 100, block_size=0)


# ---------------------------------------------------------------------- collections
def test_collection_matches_genes_by_name(pbmc_files, tmp_path, write_store):
    adata = pbmc_files[0][:, :]
    first, second = adata[:300].copy(), adata[300:].copy()
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    second = second[:, perm].copy()
    second.X = sp.csr_matrix(second.X)
    paths = [write_store(first, tmp_path / "a.h5ad"), write_store(second, tmp_path / "b.zarr")]
    disk = OnDiskDataset(paths, batch_key="phase", mode="batch")
    mem = ScDataset(adata, batch_key="phase", mode="batch")
    assert len(disk) == 700 and disk.var_names.equals(adata.var_names) and disk.files[1].name == "b.zarr"
    idx = np.random.default_rng(1).permutation(700)[:200]
    assert _same(disk[idx], mem[idx])
    assert _same(disk[np.arange(700)], mem[np.arange(700)])
    # an explicit gene order reorders every file
    genes = list(adata.var_names[::-1][:100])
    sub = OnDiskDataset(paths, genes=genes)
    np.testing.assert_array_equal(sub[idx]["x"].numpy(), adata[idx, genes].X.toarray())


def test_bad_files_are_refused_naming_the_file(pbmc_files, tmp_path, write_store):
    adata, h5ad, _ = pbmc_files
    fewer = write_store(adata[:, 5:].copy(), tmp_path / "fewer.h5ad")
    with pytest.raises(ValueError, match=r"fewer\.h5ad' lacks 5 genes: 'HES4'"):
        OnDiskDataset([h5ad, fewer])
    no_x = adata.copy()
    no_x.X = None
    no_x = write_store(no_x, tmp_path / "nox.h5ad")
    with pytest.raises(ValueError, match=r"nox\.h5ad' has no counts in X; pass layer=.*'counts'"):
        OnDiskDataset(no_x)
    with pytest.raises(KeyError, match=r"nox\.h5ad.*layer 'raw' not found"):
        OnDiskDataset(no_x, layer="raw")
    logged = adata.copy()
    logged.X = sp.csr_matrix(np.log1p(logged.X.toarray()))
    logged = write_store(logged, tmp_path / "logged.zarr")
    with pytest.raises(ValueError, match=r"logged\.zarr' X .*non-integer"):
        OnDiskDataset(logged)
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad"):
        OnDiskDataset([h5ad, str(tmp_path / "missing.h5ad")])
    with pytest.raises(KeyError, match=r"pbmc\.h5ad.*batch_key 'sample'"):
        OnDiskDataset(h5ad, batch_key="sample")
    with pytest.raises(TypeError, match="in memory"):
        OnDiskDataset(adata)


def test_dataset_pickles_without_open_files(pbmc_files):
    import pickle

    adata, h5ad, zarr = pbmc_files
    mem = ScDataset(adata)
    for path in (h5ad, zarr):
        disk = OnDiskDataset(path)
        disk[[0, 1]]  # opens the store
        copy = pickle.loads(pickle.dumps(disk))
        assert _same(copy[[9, 4, 600]], mem[[9, 4, 600]])
        disk.close()
        assert _same(disk[[3]], mem[[3]])  # reopened on the next read


def test_each_data_parallel_process_reads_only_its_own_batches(pbmc_files):
    from step.functionality.comps.trainer.sources import MiniBatchSource, Shard

    class RecordingDataset(OnDiskDataset):
        def __getitem__(self, idx):
            self.gathered.append(np.asarray(idx).copy())
            return super().__getitem__(idx)

    dataset = RecordingDataset(pbmc_files[1])
    order = list(index_loader(dataset, 64, seed=3, block_size=16, buffer_blocks=4).sampler)
    assert len(order) == 11
    for rank in (0, 1):
        dataset.gathered = []
        loader = index_loader(dataset, 64, seed=3, block_size=16, buffer_blocks=4)
        source = MiniBatchSource(loader, call_func=lambda *_: {})
        source.shard = Shard(rank, 2)
        batches = list(source.batches())
        # the last turn of rank 1 is empty: 11 batches dealt to 2 processes
        assert [b.n_obs for b in batches][-1] == (0 if rank else len(order[-1]))
        assert len(dataset.gathered) == len(order[rank::2])
        for read, expected in zip(dataset.gathered, order[rank::2], strict=True):
            np.testing.assert_array_equal(read, expected)
