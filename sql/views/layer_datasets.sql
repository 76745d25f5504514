-- views/layer_datasets: which datasets have pooled activations at a layer.
--
-- Inputs : view `activations` (layer, dataset).
-- Output : table macro layer_datasets(at_layer integer): one row per dataset extracted at `at_layer`.
-- Grain  : dataset.

create or replace temp macro layer_datasets(at_layer) as table
select distinct dataset
from activations
where layer = at_layer
