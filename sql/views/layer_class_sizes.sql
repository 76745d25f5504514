-- views/layer_class_sizes: the class sizes of the datasets that have pooled activations at a layer.
--
-- Uses   : views/class_sizes, views/layer_datasets
-- Inputs : views `samples`, `activations` (through class_sizes and layer_datasets).
-- Output : table macro layer_class_sizes(at_layer integer): the class_sizes rows (dataset, role, n_samples,
--          n_pos, n_neg) of the datasets extracted at `at_layer`.
-- Grain  : dataset.

create or replace temp macro layer_class_sizes(at_layer) as table
select class_sizes.*
from class_sizes
semi join layer_datasets(at_layer) as extracted
    on class_sizes.dataset = extracted.dataset
