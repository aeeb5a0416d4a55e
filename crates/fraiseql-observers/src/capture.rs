//! Opting tables into change capture (the trigger installed by the migrations).
