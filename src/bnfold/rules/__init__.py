"""Rules: what bnfold knows. One entry per norm type, per layer type, per op and per third-party type;
every later stage looks facts up here instead of testing types itself."""
