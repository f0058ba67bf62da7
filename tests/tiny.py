"""Overrides that shrink each model family and its default data set so a real run takes seconds on a CPU."""

TRAINER = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
           "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false", "trainer.val_check_interval=2",
           "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]

FAMILIES = {
    "unet": ["model=unet", "model.depth=2", "model.num_queries=4", "data.num_train=16", "data.num_val=8",
             "data.batch_size=4", "data.image_size=32", "data.canvas_size=32"],
    "resnet": ["model=resnet", "data.num_train=40", "data.num_val=20", "data.batch_size=8"],
    "llm": ["model=llm", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
            "model.intermediate_size=64", "data.corpus_chars=20000", "data.seq_len=32", "data.batch_size=4"],
}


def overrides(family: str, *extra: str, logger: str = "csv") -> list[str]:
    return [*FAMILIES[family], *TRAINER, f"logger={logger}", "analysis=off", *extra]
