"""Training: conversion to decoupled models and distillation, the paired experiment, the corpus."""
