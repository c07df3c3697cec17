-- Validation is not undone: the constraints stay as the previous migration left them (its own
-- down migration replaces them).
SELECT 1;
