mod actions;
mod support;
