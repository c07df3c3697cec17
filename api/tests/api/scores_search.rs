// Tests of scores_search — being written.
