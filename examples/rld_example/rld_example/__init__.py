"""A worked rld plugin: everything a user's own package adds, with no edit to `rld`.

* `rld_example.models`: `tinycnn`, a small CNN of the `cifar` family (logits only: it trains
  alone or with logit distillers; feature distillers refuse it with one line);
* `rld_example.data`: `stripes`, an in-memory data set of oriented stripes with keys of its
  own (`dataset.train_size`, ..., typed by `StripesConfig`);
* `rld_example.distiller`: `ckd`, confidence-weighted KD, a logit distiller with one setting
  beyond KD's (`gamma`);
* `conf/`: their Hydra config files (`dataset/stripes.yaml`, `distiller/ckd.yaml`,
  `pair/example.yaml`), found through `hydra.searchpath=[pkg://rld_example.conf]`.

Importing the package registers all three; rld imports it when the config says
`plugins=[rld_example]`, or by itself when the package is installed (its entry point in the
group `rld.plugins`)."""

from rld_example import data, distiller, models  # noqa: F401  (registration on import)
