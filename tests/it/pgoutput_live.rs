//! pgoutput_live
