"""Placeholder until this lab lands."""

import streamlit as st

st.info("This lab is being built.")
