-- views/tokens_around: the tokens within a half-width of each window's centre token.
--
-- Inputs : view `tokens` (dataset, sample_id, token_pos, token_text); a relation of windows, named (as a string) by the
--          caller (a CTE of its statement), with columns dataset, sample_id and a centre token position.
-- Output : table macro tokens_around(windows_of, centre_col, half): every column of `windows_of` then
--          token_pos, token_text, one row per token with |token_pos - centre| <= half (a window that
--          runs past either end of its sample is cut there).
-- Grain  : window x token.

create or replace temp macro tokens_around(windows_of, centre_col, half) as table
select windows.*, tokens.token_pos, tokens.token_text
from query_table(windows_of) as windows
inner join tokens using (dataset, sample_id)
where tokens.token_pos between windows[centre_col] - half and windows[centre_col] + half
