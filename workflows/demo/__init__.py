"""``cm3 demo``: the whole pipeline on the synthetic data set (``cm3.synthetic``), and its evaluation."""
