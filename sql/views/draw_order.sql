-- views/draw_order: the order in which a sampling mode draws a feature's activating windows.
--
-- Inputs : none (a scalar macro over the columns of describe/windows.sql's `activating` rows).
-- Output : scalar macro draw_order(sampling, ranked, act_rank, in_decile, decile, rand_key): a struct to
--          order by (then dataset, sample_id). sampling = `ranked` (describe/windows: 'top' for the
--          describer's windows, 'next' for the held-out ones) follows act_rank (by max_act); 'deciles' goes
--          round-robin over the deciles (in_decile: the seeded draw's position within the decile);
--          'random' follows the seeded draw (rand_key) over every activating sample.
-- Grain  : one value per activating (feature, sample).

create or replace temp macro draw_order(sampling, ranked, act_rank, in_decile, decile, rand_key) as {
    'round': case sampling when ranked then act_rank when 'random' then 0 else in_decile end,
    'decile': case sampling when 'deciles' then decile else 0 end,
    'draw': case sampling when ranked then 0 else rand_key end
}
