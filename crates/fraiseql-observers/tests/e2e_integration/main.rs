mod actions;
mod leader;
mod listener;
mod parser;
mod support;
