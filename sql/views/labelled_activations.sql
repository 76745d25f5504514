-- views/labelled_activations: every pooled activation row with its sample's label, class and role.
--
-- Inputs : views `activations` (layer, dataset, sample_id, feature_id, max_act, ...) and `samples`
--          (dataset, sample_id, label, is_positive, role).
-- Output : temp view labelled_activations: the activation row's columns (layer, dataset, sample_id,
--          feature_id, max_act, mean_act, argmax_token, ...), then the sample's (label, is_positive, role,
--          ...: every column of `samples` but the keys; the scan reads only those a query uses); rows whose
--          sample is not in `samples` are dropped (an inner join). Filter on layer and max_act as on
--          `activations`: DuckDB pushes the filters into the scan.
-- Grain  : layer x dataset x sample_id x feature_id.

create or replace temp view labelled_activations as
select
    activations.*,
    samples.* exclude (dataset, sample_id)
from activations
inner join samples
    using (dataset, sample_id)
