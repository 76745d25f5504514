-- feature_id_range: asset check on activations; feature ids outside [0, $sae_width) at one layer.
--
-- Inputs : view `activations` (layer, dataset, feature_id).
-- Params : $layer integer, $sae_width integer (number of features of the layer's SAE)
-- Output : one row per dataset with out-of-range ids: n_rows, min_feature_id, max_feature_id;
--          no rows means the check passes (a wrong SAE width or a mixed-up SAE).
-- Grain  : layer x dataset.

with

out_of_range as (
    select
        dataset,
        feature_id
    from activations
    where layer = $layer
        and (feature_id < 0 or feature_id >= $sae_width)
),

final as (
    select
        cast($layer as integer) as layer,
        dataset,
        count(*) as n_rows,
        min(feature_id) as min_feature_id,
        max(feature_id) as max_feature_id
    from out_of_range
    group by dataset
)

select * from final
order by dataset
