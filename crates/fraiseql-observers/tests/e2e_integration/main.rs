mod listener;
mod parser;
mod support;
