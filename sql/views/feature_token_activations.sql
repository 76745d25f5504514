-- views/feature_token_activations: the per-token activations of some features at a layer.
--
-- Inputs : view `token_activations` (layer, dataset, sample_id, token_pos, feature_id, act).
-- Output : table macro feature_token_activations(at_layer integer, feature_ids integer[]): dataset,
--          sample_id, token_pos, feature_id, act for the features in `feature_ids` (a token where a feature
--          was silent has no row).
-- Grain  : dataset x sample_id x token_pos x feature_id.

create or replace temp macro feature_token_activations(at_layer, feature_ids) as table
select
    dataset,
    sample_id,
    token_pos,
    feature_id,
    act
from token_activations
where layer = at_layer
    and list_contains(feature_ids::integer[], feature_id)
