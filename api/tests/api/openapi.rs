// Tests of openapi — being written.
